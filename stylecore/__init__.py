from .allocator import keep_freed_memory_for_reuse

keep_freed_memory_for_reuse()  # before any thread starts: see allocator.py
