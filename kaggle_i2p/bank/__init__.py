"""Retrieval banks: the folder format, exact and FAISS search, the index, build-bank, and the text files it reads.

The two settings the CLI shows in its help live here, so that `kaggle-i2p --help` imports nothing heavy."""

INDEX_TYPES = ("ivf-pq",)  # the FAISS index kinds build-bank and index-bank make
SHARD_ROWS = 100_000  # texts per resumable build-bank shard
