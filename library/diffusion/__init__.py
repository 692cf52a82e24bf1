"""Diffusion training math as pure functions with explicit generators.

ddpm.py            the DDPM schedule (SD1.x/2.x, SDXL) and timestep sampling
noise.py           noise offset, multi-resolution noise, input perturbation
losses.py          element losses (l1, l2, huber, smooth_l1), SNR-based weights, masked reduction
ddpm_step.py       the DDPM loss of one batch, shared by the SD1.x/2.x and SDXL trainers
flow_matching.py   SD3 rectified flow: timestep densities, shift, loss weighting, the loss of one batch
samplers.py        preview samplers for DDPM models (sd-scripts' --sample_sampler names)
flow_sampling.py   the Euler preview sampler for flow-matching models
"""
