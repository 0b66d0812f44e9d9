"""`vitae models`: the registered ViTAE models with their parameter counts and GFLOPs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the registered models with parameters and GFLOPs")
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vitaev2_*'")
    parser.add_argument("--img-size", type=int, default=224, help="input size for the GFLOPs column")
    parser.set_defaults(handler=list_models_command)


def list_models_command(args: argparse.Namespace) -> int:
    import vitae
    from vitae.flops import model_stats

    from infra.errors import UserError

    names = vitae.list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; try `vitae models`")
    print(f"{'model':<14}{'params':>14}{'trainable':>14}{'GFLOPs':>9}   (at {args.img_size}px, 1000 classes)")
    for name in names:
        try:
            stats = model_stats(name, img_size=args.img_size)
        except ValueError as error:
            print(f"{name:<14}{'-':>14}{'-':>14}{'-':>9}   {error}")
            continue
        print(f"{name:<14}{stats['params']:>14,}{stats['trainable_params']:>14,}{stats['gmacs']:>9.2f}")
    print("GFLOPs count one multiply-add as one operation, as the ViTAE papers do.")
    return 0
