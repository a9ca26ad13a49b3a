"""The recommendation service: an aiokafka consumer of the updates topic and an aiohttp server that
answers top-K from packed rows."""
