"""What a prediction runs (the part the Kaggle notebook needs): the pipeline, images, cache, devices, the CSV,
the dry run and the plan."""
