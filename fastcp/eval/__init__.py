"""fastcp.eval"""
