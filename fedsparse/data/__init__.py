"""GLUE data: TSV parsing, bundled assets, partitioning, and the node-local disk cache."""
