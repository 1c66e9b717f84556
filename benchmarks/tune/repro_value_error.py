import torch, flash_attn.build_info as bi
ext = bi.cuda_extension()
q = torch.randn(1, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
for args in [dict(p_dropout=1.0), dict(softcap=-1.0)]:
    try:
        kw = dict(q=q, k=q, v=q, out=None, alibi_slopes=None, softmax_scale=0.1, window_size_left=-1, window_size_right=-1, softcap=0.0)
        kw.update(args)
        ext.fwd(**kw)
        print("no error", args)
    except Exception as e:
        print("caught", type(e).__name__, e)
