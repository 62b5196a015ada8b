"""Tower kinds, one module each (`regressor`, `retrieval`, `prior`), registered in `kaggle_i2p.core.registry.KINDS`
as they are imported; the registry imports them on first use, so nothing needs to import this package."""
