"""sats.losses"""
