"""fastcp.models"""
