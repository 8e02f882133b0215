"""Quality metrics: fidelity (PSNR/SSIM), identity and landmarks (dlib), FID, perceptual (LPIPS/DISTS),
and the networks behind the metrics whose weights a user supplies."""
