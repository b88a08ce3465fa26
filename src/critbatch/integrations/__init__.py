"""Hand a critbatch batch schedule to the trainers people use: Hugging Face ``Trainer``
(:mod:`.hf_trainer`), OLMo-core (:mod:`.olmo_core`) and Megatron-LM (:mod:`.megatron`).

These modules import critbatch (and, when called, the trainer's own package); critbatch never
imports them, and none of those packages is needed for anything else.
"""
