"""luo.testing"""
