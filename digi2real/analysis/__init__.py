"""What a finished dataset is worth: ``metrics`` (streamed faiss figures over embeddings),
``report`` (figures, pictures, HTML), ``prune`` (a cleaned copy) and ``card`` (the dataset card
with its licence chain)."""
