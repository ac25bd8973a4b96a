"""luo.mem"""
