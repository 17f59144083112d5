"""fastcp.data"""
