"""Pseudo-labels: the teacher over the pool, the selection, the table on disk, the out-of-class
filter, and the images a person should label next."""
