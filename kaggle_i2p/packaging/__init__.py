"""The offline install for Kaggle: the wheelhouse."""
