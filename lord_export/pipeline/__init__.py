"""The compression pipeline: groups → factors → LoRD modules (``planner``), block-by-block streaming
(``streaming``, ``modes``, ``engine``), the parameter budget (``survey``, ``sensitivity``), the
one-call API (``compress``) and healing (``heal``)."""
