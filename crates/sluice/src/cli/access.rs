//! `sluice user`, `sluice vhost` and `sluice permission`: who may connect and
//! to which virtual hosts, through any node's HTTP admin port (like
//! `rabbitmqctl add_user|add_vhost|set_permissions`). Passwords are sent to
//! the node, which stores only a salted hash.

use std::io::BufRead;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::amqp::{print_list, segment, text};
use super::cluster::{request_json, AdminArgs};

#[derive(Args, Debug)]
pub struct UserArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: UserCommand,
}

/// Where a password comes from: the flag leaves it in the shell's history,
/// standard input does not.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct PasswordArg {
    #[arg(long)]
    password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordArg {
    fn read(self) -> Result<String> {
        if let Some(p) = self.password {
            return Ok(p);
        }
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        let p = line.trim_end_matches(['\r', '\n']).to_owned();
        if p.is_empty() {
            bail!("no password on standard input");
        }
        Ok(p)
    }
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Users, their tags and the virtual hosts each may use.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create a user (it may use no virtual host until `sluice permission set`).
    Create {
        name: String,
        #[command(flatten)]
        password: PasswordArg,
        /// A tag such as administrator or monitoring; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Change a user's password (and tags, when given).
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordArg,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a user.
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct VhostArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: VhostCommand,
}

#[derive(Subcommand, Debug)]
enum VhostCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create a virtual host.
    Create { name: String },
    /// Delete a virtual host and everything in it: queues with their messages,
    /// exchanges, bindings, permissions.
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct PermissionArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: PermissionCommand,
}

#[derive(Subcommand, Debug)]
enum PermissionCommand {
    /// Let a user use a virtual host (all of its resources).
    Set {
        user: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Withdraw a user's virtual host.
    Clear {
        user: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
}

pub async fn run_user(args: UserArgs) -> Result<()> {
    let http = &args.admin.http;
    match args.command {
        UserCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/users", None).await?;
            print_list(&v, json, &["name", "tags", "vhosts"], |u| {
                vec![text(u, "name"), joined(u, "tags"), joined(u, "vhosts")]
            })
        }
        UserCommand::Create {
            name,
            password,
            tags,
        } => {
            if exists(http, &name).await? {
                bail!("user '{name}' exists already (sluice user passwd changes a password)");
            }
            put_user(http, &name, password, tags).await?;
            println!("user {name} created");
            Ok(())
        }
        UserCommand::Passwd {
            name,
            password,
            tags,
        } => {
            if !exists(http, &name).await? {
                bail!("no user '{name}'");
            }
            put_user(http, &name, password, tags).await?;
            println!("password of user {name} changed");
            Ok(())
        }
        UserCommand::Delete { name } => {
            let path = format!("/api/v1/users/{}", segment(&name));
            request_json(http, "DELETE", &path, None).await?;
            println!("user {name} deleted");
            Ok(())
        }
    }
}

async fn exists(http: &str, name: &str) -> Result<bool> {
    let v = request_json(http, "GET", "/api/v1/users", None).await?;
    Ok(v.as_array()
        .is_some_and(|users| users.iter().any(|u| u["name"] == name)))
}

async fn put_user(http: &str, name: &str, password: PasswordArg, tags: Vec<String>) -> Result<()> {
    let body = json!({ "password": password.read()?, "tags": tags });
    let path = format!("/api/v1/users/{}", segment(name));
    request_json(http, "PUT", &path, Some(&body)).await?;
    Ok(())
}

pub async fn run_vhost(args: VhostArgs) -> Result<()> {
    let http = &args.admin.http;
    match args.command {
        VhostCommand::List { json } => {
            let v = request_json(http, "GET", "/api/v1/vhosts", None).await?;
            print_list(&v, json, &["name", "queues", "exchanges", "users"], |h| {
                vec![
                    text(h, "name"),
                    text(h, "queues"),
                    text(h, "exchanges"),
                    joined(h, "users"),
                ]
            })
        }
        VhostCommand::Create { name } => {
            let path = format!("/api/v1/vhosts/{}", segment(&name));
            request_json(http, "PUT", &path, None).await?;
            println!("vhost {name} created");
            Ok(())
        }
        VhostCommand::Delete { name } => {
            let path = format!("/api/v1/vhosts/{}", segment(&name));
            request_json(http, "DELETE", &path, None).await?;
            println!("vhost {name} deleted");
            Ok(())
        }
    }
}

pub async fn run_permission(args: PermissionArgs) -> Result<()> {
    let http = &args.admin.http;
    match args.command {
        PermissionCommand::Set { user, vhost } => {
            let path = format!("/api/v1/permissions/{}/{}", segment(&vhost), segment(&user));
            request_json(http, "PUT", &path, None).await?;
            println!("user {user} may use vhost {vhost}");
            Ok(())
        }
        PermissionCommand::Clear { user, vhost } => {
            let path = format!("/api/v1/permissions/{}/{}", segment(&vhost), segment(&user));
            request_json(http, "DELETE", &path, None).await?;
            println!("user {user} may no longer use vhost {vhost}");
            Ok(())
        }
    }
}

fn joined(v: &serde_json::Value, key: &str) -> String {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}
