"""sats.data"""
