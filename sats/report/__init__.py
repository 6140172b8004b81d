"""sats.report"""
