"""``kvc`` with uneven heads kept in the padded form, the comparison for pages (``kvcompress/cache/pages.py``): every
codec storage keeps ``page_size = None``, so each KV head holds the fullest head's slot count and the padding slots
are memory (how AdaKV and DuoAttention were held before pages). ``sweep.sh paged`` runs it:

    .venv/bin/python results/eviction/padded.py -m experiment=eviction_policies policy=adakv \\
        results_dir=results/eviction/padded publish=true progress=false

Its records (``padded/records.jsonl``, ``paged_fraction`` 0) are the padded twins that ``table.yaml`` compares with
the paged records of the same policy and budget.
"""
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.run import main

if __name__ == "__main__":
    CodecStore.page_size = None
    main()
