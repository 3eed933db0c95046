"""Reading run directories: the run writer's files, tables, plots and the README/docs report blocks (`python -m fedsparse.report`); no torch, no Flower."""
