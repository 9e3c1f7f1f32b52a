"""The paged KV cache: `block_pool` (block ids, free queue, ref counts) and `manager`
(`KVCacheManager`: the one owner of which blocks each sequence holds) are pure Python;
`store` holds the tensors behind the block ids and the paged `KVView` attention reads through,
in one of the `codecs` (fp32 / fp16 / bf16 / int8 / KIVI int4, int2; `window`: their fp16 partial blocks).
"""
