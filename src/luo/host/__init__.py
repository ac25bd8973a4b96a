"""luo.host"""
