"""The recommendation service: a faust-streaming app serving top-K from packed rows."""
