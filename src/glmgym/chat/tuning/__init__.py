"""Fine-tuning: P-Tuning v2, LoRA and full fine-tuning, their data, and scoring generated answers."""
