"""fastcp.methods"""
