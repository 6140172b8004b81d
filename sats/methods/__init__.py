"""sats.methods"""
