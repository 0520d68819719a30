"""xross.analysis: Why a cohort's training helped or not: flatness, entropy, embeddings (``diagnose``), linear CKA
(``similarity``) and the plots of every report. May import ``xross.cohort`` and ``xross.data``.
"""
