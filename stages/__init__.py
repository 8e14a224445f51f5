"""One module per CLI stage; each is a straight recipe over `pipeline` components."""
