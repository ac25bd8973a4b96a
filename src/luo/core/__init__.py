"""luo.core"""
