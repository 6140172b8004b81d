"""sats.models"""
