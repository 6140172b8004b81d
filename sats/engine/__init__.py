"""sats.engine"""
