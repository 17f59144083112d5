"""fastcp.dc"""
