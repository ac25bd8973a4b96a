"""luo.handlers"""
