"""luo.vmm"""
