"""LLM Systems, Hands-On: the helper library the course notebooks import.

Each module holds one idea; the notebooks show the interesting lines inline and call these to prove
that the inline version and the tested one agree.
"""
