"""Reading models: a Hub id, a local folder or the embedded default (:mod:`.models`), and a checkpoint's
shards tensor by tensor without loading it (:mod:`.shards`)."""
