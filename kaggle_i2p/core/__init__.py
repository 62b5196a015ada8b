"""The base every layer stands on: errors, the registries, files, validation, the ensemble math, ranks."""
