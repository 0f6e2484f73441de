"""Tokenize OpenWebText and FineWeb-Edu into GPT-2 token shards for `data=openwebtext|fineweb_edu`.

`python -m data_prep.prepare --help` lists the options; `data_prep/README.md` describes the
output folder and how an interrupted preparation resumes.
"""
