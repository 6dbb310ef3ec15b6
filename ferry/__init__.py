"""Ferry's operator side: the `ferry` command, the local broker and the demo (the client
is `streams.front.client.FerryClient`)."""
