"""Local training and evaluation of a method's model, and the GLUE metrics."""
