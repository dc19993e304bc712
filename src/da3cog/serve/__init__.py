"""The Replicate (cog) model: everything ``predict.py`` delegates to.

* :mod:`~da3cog.serve.inputs`: the canonical input table (names, types, defaults, choices,
  bounds, descriptions) that ``predict.py`` spells out and the tests hold it to;
* :mod:`~da3cog.serve.request`: validating a request and planning it before any GPU work;
* :mod:`~da3cog.serve.media`: the request's views from an image, a zip, a video, more images;
* :mod:`~da3cog.serve.models`: the model cache (lazy loading, GPU memory bound, LRU offload)
  and where weights come from (Hub or ``$DA3COG_WEIGHTS_DIR``);
* :mod:`~da3cog.serve.outputs`: files, unique names, videos and the request manifest (the Gaussian
  fly-through is the export format ``gaussians_video``, :mod:`da3cog.export.video`);
* :mod:`~da3cog.serve.handler`: one request end to end, with its own temporary folder;
* :mod:`~da3cog.serve.schema`: the OpenAPI schema ``cog build`` would generate
  (``python -m da3cog.serve.schema``), which the cog server validates inputs against.

Needs the ``cog`` extra (``pip install -e ".[cog]"``).
"""
