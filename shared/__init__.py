"""crio-py's common library: the bus, errors, configuration, logging, tracing and privileges."""
