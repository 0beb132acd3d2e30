"""Task YAMLs and their dataset builders (a package so that wheels ship them)."""
