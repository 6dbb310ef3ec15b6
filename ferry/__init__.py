"""Ferry's operator side: the `ferry` command, the local broker and the request client."""
