from himoe.data.corpus import CharTokenizer, default_corpus_path, load_corpus, split_train_val

__all__ = ["CharTokenizer", "default_corpus_path", "load_corpus", "split_train_val"]
