"""luo.client"""
