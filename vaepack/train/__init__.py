"""Training: distillation of compact encoders/decoders (paper 000) and the eps-VAE diffusion decoder
(paper 004).

Modules (import the one you need; this file imports none of them):

- ``config``     typed run configs: ``DistillConfig``, ``DistillDecoderConfig``, ``EpsTrainConfig``;
                 ``parse_schedule``, ``parse_model_config``, ``distill_config`` (what `vaepack distill` builds)
- ``common``     device-independent helpers of every trainer: autocast, training images, atomic saves,
                 provenance metadata, EMA, stop on Ctrl-C / time limit, the run log
- ``teachers``   teacher loading (a zoo model as teacher modules, an upstream TAE .pth)
- ``pool``       the distillation view pool: teacher outputs cached per image view, random crops
- ``warmstart``  warm starts: depth-pruned / channel-pruned TAE students, strict ``--init`` loading
- ``distill``    the distillation trainer: ``run_distill``, ``run_distill_decoder``, ``export_checkpoint``
- ``eps_data``, ``eps_losses``, ``eps``   eps decoder training: ``run_train_eps``, ``export_weights``,
                 ``load_eps_decoder``, ``eval_nfe``
"""
