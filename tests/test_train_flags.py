"""diffusers' training flags that fastcp takes (DESIGN.md section 11): each one changes what it
should, through ``python -m fastcp.train``'s own code path (in process, tiny model)."""
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastcp import train

TINY = ["--max_concepts", "1", "--max_train_steps", "2", "--num_eval_images", "1", "--eval_inference_steps", "2",
        "--dc_timesteps", "2", "--dc_eval_images", "2", "--train_batch_size", "2", "--overwrite_output_dir"]


def run(tmp_path, name, *flags) -> dict:
    out = tmp_path / name
    assert train.main(["--output_dir", str(out), *TINY, *flags]) == 0
    return load_file(str(next(out.glob("task_01_*/pytorch_lora_weights.safetensors"))))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"), "base")


@pytest.mark.parametrize("flags", [
    ["--lr_scheduler", "cosine", "--lr_warmup_steps", "1"], ["--lr_scheduler", "linear"],
    ["--lr_scheduler", "polynomial", "--lr_power", "2"], ["--adam_beta1", "0.5"], ["--adam_beta2", "0.9"],
    ["--adam_epsilon", "1e-2"], ["--adam_weight_decay", "0.5"], ["--max_grad_norm", "1e-4"],
    ["--random_flip"], ["--snr_gamma", "1.0"], ["--noise_offset", "0.5"],
])
def test_flag_changes_the_trained_adapter(tmp_path, baseline, flags):
    assert max_diff(baseline, run(tmp_path, "flag", *flags)) > 1e-7, flags


def test_defaults_reproduce_the_baseline_and_center_crop_is_a_noop_on_square_images(tmp_path, baseline):
    assert max_diff(baseline, run(tmp_path, "again")) == 0
    assert max_diff(baseline, run(tmp_path, "cc", "--center_crop")) == 0


def test_warmup_starts_from_a_zero_learning_rate(tmp_path):
    adapter = run(tmp_path, "warm", "--max_train_steps", "1", "--lr_scheduler", "constant_with_warmup",
                  "--lr_warmup_steps", "10")
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter.items() if "lora_B" in k)


def test_weight_decay_with_several_adapter_slots_is_refused(tmp_path, capsys):
    assert train.main(["--output_dir", str(tmp_path / "o"), *TINY, "--max_concepts", "2", "--method", "separate",
                       "--adam_weight_decay", "0.1"]) == 2
    assert "--adam_weight_decay 0.1: this method keeps" in capsys.readouterr().err


def test_prior_preservation_generates_class_images_once_and_trains_on_them(tmp_path, baseline):
    classes = tmp_path / "classes"
    flags = ["--with_prior_preservation", "--class_data_dir", str(classes), "--num_class_images", "3",
             "--class_prompt", "a photo of a star"]
    prior = run(tmp_path, "prior", *flags)
    made = sorted(classes.glob("*.png"))  # a single concept uses the folder itself, as diffusers does
    assert len(made) == 3 and max_diff(baseline, prior) > 1e-7
    stamp = [p.stat().st_mtime_ns for p in made]
    again = run(tmp_path, "prior2", *flags)  # the folder is full: nothing regenerated, same result
    assert [p.stat().st_mtime_ns for p in sorted(classes.glob("*.png"))] == stamp
    assert max_diff(prior, again) == 0
    weighted = run(tmp_path, "prior3", *flags, "--prior_loss_weight", "0.1")
    assert max_diff(prior, weighted) > 1e-7


def test_resolution_sets_the_training_image_size(tmp_path):
    run(tmp_path, "res", "--resolution", "16")
    config = json.loads((tmp_path / "res" / "results.json").read_text())["config"]
    assert config["resolution"] == 16


# ----------------------------------------------------------------------------- the pieces, by hand
def test_min_snr_weights_by_hand():
    from diffusers import DDPMScheduler

    from fastcp.models.noise import min_snr_weights

    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 500, 999])
    acp = sched.alphas_cumprod[t]
    snr = acp / (1 - acp)
    expect = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(sched, t, 5.0), expect)
    assert torch.allclose(min_snr_weights(sched, t, 5.0, "v_prediction"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_noisy_input_matches_diffusers():
    from diffusers import DDPMScheduler

    from fastcp.models.noise import noisy_input_and_target

    sched = DDPMScheduler(num_train_timesteps=1000)
    x, e, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([3, 400, 990])
    x_t, v = noisy_input_and_target(sched, x, e, t, "v_prediction")
    assert torch.equal(x_t, sched.add_noise(x, e, t)) and torch.equal(v, sched.get_velocity(x, e, t))


def test_random_flip_and_random_crop_draws():
    from fastcp.data.images import TrainImages

    class Identity:  # a pixel-space backbone
        @staticmethod
        def encode_images(x):
            return x.float()

    square = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    pool = TrainImages(Identity(), square, random_flip=True)
    out = pool.draw(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0]), torch.Generator().manual_seed(0))
    flips = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    for b in range(8):
        assert torch.equal(out[b], square[0].flip(-1) if flips[b] else square[0])
    wide = [torch.arange(3 * 4 * 7, dtype=torch.float32).view(3, 4, 7)]
    crop = TrainImages(Identity(), wide[0][:, :, 1:5].unsqueeze(0), full=wide, center_crop=False)
    out = crop.draw(torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(1))
    offsets = {int(o) for o in (torch.rand(16, generator=torch.Generator().manual_seed(1)) * 3).round()}
    assert len(offsets) > 1  # several crops drawn
    for img in out:
        assert any(torch.equal(img, wide[0][:, :, o:o + 4]) for o in offsets)


def test_exif_orientation_is_applied(tmp_path):
    from fastcp.data.concepts import load_image_folder

    folder = tmp_path / "phone"
    folder.mkdir()
    img = Image.new("RGB", (8, 4), "white")
    img.paste((255, 0, 0), (0, 0, 4, 4))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    (folder / "p.jpg").write_bytes(buf.getvalue())
    x = load_image_folder(folder, 4, full=(full := []))
    # displayed upright the image is 4 wide x 8 high with red on top
    assert full[0].shape == (3, 8, 4)
    assert full[0][0, :4].mean() > 0.8 and full[0][1, :4].mean() < -0.8 and full[0][1, 4:].mean() > 0.8
    assert x.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("method", ["dsc", "fl2t"])
def test_gradient_checkpointing_keeps_the_routing_of_the_forward(tmp_path, method):
    """dsc (teacher rows through coef, the DC cross-attention processor) and fl2t (per-layer coef)
    set their routing for the duration of a call; the recomputation in backward must see it."""
    flags = ["--method", method, "--max_concepts", "2", "--dc_images", "2"]
    plain = run(tmp_path, "plain", *flags)
    assert max_diff(plain, run(tmp_path, "gc", *flags, "--gradient_checkpointing")) < 1e-6
