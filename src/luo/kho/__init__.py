"""luo.kho"""
